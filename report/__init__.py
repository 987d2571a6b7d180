"""Reporting: the study table and the plots of the pipeline's stages (not library code)."""
