"""What every layer shares: the plan as data, errors and exit codes, peft's naming rules, text helpers.

Nothing here reads files or imports torch, transformers or peft.
"""
