"""Choosing and checking before spending compute.

``doctor`` lints a config against docs/practices.md (each finding: severity, what, why, fix,
link); ``memory`` estimates the memory of full / LoRA / QLoRA from the model's config alone
(no weights); ``advice`` turns model + data + memory into a strategy; ``sweep`` runs short
LR x rank trials and picks a winner; ``run`` is ``tunelab train`` as the CLI runs it (doctor
first, then the recipe, then the HTML report).
"""
