"""tune-kd: Ray Tune sweeps for knowledge distillation (SimKD and its variants) on CIFAR."""

__version__ = "0.1.0"
