"""storyseek.export"""
