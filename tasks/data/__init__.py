"""The data plane: sources → clean → contracts → split → a versioned dataset directory."""
