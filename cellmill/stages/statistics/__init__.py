"""Stage `statistics`: grouped moments of the log-normalised values and Welch t-tests."""
