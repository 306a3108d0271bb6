"""nnU-Net v2 integration: trainer variants, sample store wiring, extTrainer shim folder."""
