"""The model: its schema, the proxy head's operations, RegProxy and the linear baseline, backbone plugins, FLOPs."""
