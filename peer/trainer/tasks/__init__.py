"""Built-in tasks. Import them through ``peer.trainer.load_task`` (lazy: only the chosen task's
data is read)."""
