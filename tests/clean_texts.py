"""Texts the clean tests share: verse like the Shakespeare sample, an article like the news sample,
spam that repeats itself, and English on which the regex word tokenizer and spaCy part ways."""

from __future__ import annotations

VERSE = """ROMEO.
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun!
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she:
Be not her maid, since she is envious;
Her vestal livery is but sick and green,
And none but fools do wear it; cast it off.

JULIET.
Ay me!

ROMEO.
She speaks:
O, speak again, bright angel! for thou art
As glorious to this night, being o'er my head,
As is a winged messenger of heaven
Unto the white-upturned wondering eyes
Of mortals that fall back to gaze on him.

[Enter Nurse.]"""

ARTICLE = (  # like the news sample: a title, then the body on one line
    "Council approves new cycle lanes for the city centre\n\n"
    "The city council voted on Tuesday to build four new protected cycle lanes through the centre, after a "
    "two-year consultation with residents and local businesses. The plan, which will cost about 12 million "
    "pounds, is meant to cut traffic and make short trips safer for children walking to school. Shop owners "
    "on the high street had warned that removing parking spaces would hurt trade, and the final design keeps "
    "a loading bay on every block. Work is due to start in the spring and to finish before the end of next "
    "year. Opposition members said they would watch the costs closely and asked for a yearly report."
)

REPETITIVE = "Buy cheap pills now. Buy cheap pills now. Click here to buy cheap pills now.\n" * 12

MIXED = (  # contractions, abbreviations, times, numbers, URLs, addresses: where tokenizers disagree
    "I didn't call'd U.S. officials on 01/06/2017, she's paid $3.50 -- wow... "
    "\"It's 9:30 a.m.,\" she said; they'll e-mail the 2nd-hand co-op (10% off!) at 5pm. "
    "Rock 'n' roll isn't dead: the '90s were 'great' - or weren't they? O'Neill's ship sails at dawn.\n"
    "Prices rose 3.5% to £1,200.50 in Q3; see www.example.com/news?id=7 or mail jane@example.org."
)
