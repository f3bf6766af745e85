"""`grpokit compare`: GRPO, PPO and DPO on the same task and sample budget (`run`), then the report
with plots (`report`); `settings` holds what the runs share and each algorithm's own knobs."""
