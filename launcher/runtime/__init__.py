"""Process lifetime: process groups, torchrun as we start it, the supervisor, watchdog, preemption, test-only faults."""
