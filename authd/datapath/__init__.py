"""The BPF datapath: the object's layout mirror, libbpf binding, maps, loader and ring-buffer events."""
