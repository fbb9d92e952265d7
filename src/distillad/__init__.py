"""distillad: unsupervised visual anomaly detection by teacher-student knowledge distillation."""

__version__ = "0.1.0"
