"""Training: the one routine (fit) and its strategies (one process, Ray Train), calibration, the teacher's memory."""
