"""Simulation of realistic cryo-ET projects with ground truth."""
