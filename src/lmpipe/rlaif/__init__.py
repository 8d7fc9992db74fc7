"""RLAIF: preference data labelled by a judge (rules, a reward model or an LM) from a
policy's own replies. ``python -m lmpipe.label`` is the entrypoint; ``judges`` score
replies, ``labeler`` samples, judges, pairs and writes them (resumably)."""
