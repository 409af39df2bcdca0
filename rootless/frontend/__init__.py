"""The Containerfile frontend (BuildKit's parser, shell lexer and instruction rules); imports only errors."""
