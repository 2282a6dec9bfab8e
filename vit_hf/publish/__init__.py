"""What a run hands over: the exported model folder, its card and charts, attention maps, the Hub upload."""
