"""Offline evaluation of a method on labelled images: metrics (scikit-learn, numpy) and matplotlib plots."""
