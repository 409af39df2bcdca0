"""OCI and Docker image documents, references, local names and image transports."""
