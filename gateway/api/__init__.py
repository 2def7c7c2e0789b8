"""The staff API and live console (issue 8), served by ``eldersafe server`` in its own loop."""
