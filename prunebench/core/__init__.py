"""What works on any nn.Module: masks, granularity, structure, selection, allocation, weight
statistics, curvature, layer-wise calibration, sparse execution, device and distributed set-up.
Imports only config/."""
