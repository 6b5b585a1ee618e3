"""Tests of pickrank.doctor: the doctor's checks."""
