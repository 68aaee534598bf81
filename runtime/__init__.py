"""lamina's container runtime: namespaces, cgroups, volumes and container lifecycle, on top of unionfs and store."""
