"""genrecal.common: what every layer may import: the typed pipeline config (the single source of
truth), the names it speaks in, crash-safe file writes, the torchrun rank and their errors.
Imports nothing else of genrecal."""
