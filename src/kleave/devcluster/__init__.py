"""A real local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler,
kwok) built from Go modules, for kleave's tests, demo and CLI. No Docker engine needed."""
