"""Tests of pickrank.report: the HTML pages, in Chromium too."""
