"""Deployment helpers: Kubernetes (KubeRay) manifests generated from the project's own config files."""
