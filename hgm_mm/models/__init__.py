"""The model: configs and built-in model names, the tower adapters, `HGMModel` with its scene
readers and fusion, creation (`create_model`), the saved folder, and the CPU inference copies."""
