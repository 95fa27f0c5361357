from ckpt_migrate.cli import main

main()
