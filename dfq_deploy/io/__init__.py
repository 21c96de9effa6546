"""What a build writes and reads: file names, atomic writes, the calibration set, verified caches, locks,
build keys and signal-safe cleanup."""
