"""TVM lowering: the Relax phase runner (`phases`), converters for graphopt's integer ops, CPU
schedules, the int8 / low-bit kernels and the dot-kernel registry, and the support check.

Reads target data (`graphopt.targets`); never imports backends, tuning or the API.
"""
