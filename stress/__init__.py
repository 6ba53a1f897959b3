"""Stress tests a model is put through, shared by the trials and the analysis: corruptions and adversarial attacks."""
