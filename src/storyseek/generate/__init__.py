"""storyseek.generate"""
