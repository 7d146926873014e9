"""bscan: batch-size scans, gradient noise scale and critical batch size for transformer LMs."""
