"""Autotuning: MetaSchedule tasks and runners (`metaschedule`), the crash-safe record database
(`database`), RPC device farms (`rpc`) and QEMU instruction counting (`icount`).

The top layer of targets: reads lowering and backends, nothing imports it but the API.
"""
