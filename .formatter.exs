[
  inputs: ["{mix,.formatter}.exs", "{config,lib,test,demo,bench,examples}/**/*.{ex,exs}"]
]
