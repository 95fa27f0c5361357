from ckpt_migrate.interrupts import entry_point

entry_point()
