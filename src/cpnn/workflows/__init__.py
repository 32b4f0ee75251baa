"""End-to-end workflows that tie readers, encoders, prototypes and the model together."""
