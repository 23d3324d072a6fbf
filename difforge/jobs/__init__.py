"""Submitting pipelines to a Ray cluster and recurring schedules."""
