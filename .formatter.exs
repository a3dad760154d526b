[
  inputs: ["{mix,.formatter}.exs", "{config,lib,support,test,demo,bench,examples}/**/*.{ex,exs}"]
]
