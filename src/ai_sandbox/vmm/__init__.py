"""VMM drivers behind one protocol (base.Driver)."""
