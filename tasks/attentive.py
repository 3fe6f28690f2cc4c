"""Attentive probe (V-JEPA style): frozen encoder, one learned query, one cross-attention block,
then linear. Trained on the run's cached frozen tokens with the finetuning loop (tasks/finetune.py),
only the head learning."""

from __future__ import annotations

from tasks.finetune import Finetune


class AttentiveProbe(Finetune):
    """Attentive probe: frozen encoder tokens, one learned query cross-attending, linear."""

    name = "attentive"
