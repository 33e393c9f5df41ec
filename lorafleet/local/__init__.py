"""The fleet on one machine: an embedded Kubernetes API and (later) the local node agent."""
