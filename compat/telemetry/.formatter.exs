[
  inputs: ["{mix,.formatter}.exs", "test/**/*.{ex,exs}"]
]
