"""Celery workers for the CPU and GPU queues: index builds, training, offline updates."""
