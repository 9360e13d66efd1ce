"""Evaluation reports computed from model predictions (classification and regression metrics)."""
