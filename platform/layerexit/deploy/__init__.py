"""Deployment helpers: Kubernetes (KubeRay) manifests generated from the project's own config files (``k8s``), and
what a training run needs from the Ray cluster it runs on, checked before workers start (``cluster``)."""
