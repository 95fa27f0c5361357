"""The verbs behind ckpt_migrate.api: each step of fix, export and verify, in small modules."""
