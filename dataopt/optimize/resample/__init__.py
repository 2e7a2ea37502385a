"""Resampling: how often each kept training sample is drawn (``RESAMPLERS`` in :mod:`.resamplers`;
shared helpers in :mod:`.common`)."""
