"""Model building blocks (MONAI networks + presets); networks compute, they do not train."""
