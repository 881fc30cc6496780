"""Language identification on short captions: accuracy and speed of the candidates whose model ships in the wheel.

Usage: ``python benchmarks/language_id.py [candidate ...]`` with the candidates installed (each may live in its own
``--target`` folder on PYTHONPATH). Candidates: py3langid, langid, lingua (``lingua-language-detector``).
fasttext-langdetect downloads its model at first use and gcld3 has no wheel for this Python, so they are not
candidates. The captions are short alt-text-like phrases, 12 per language in 8 languages, written for this benchmark.
"""

from __future__ import annotations

import sys
import time

CAPTIONS = {
    "en": [
        "a red car parked on the street",
        "portrait of a smiling woman",
        "sunset over the mountains",
        "black dog running on the beach",
        "vintage wooden chair",
        "fresh vegetables at the market",
        "man riding a bicycle in the city",
        "close up of a yellow flower",
        "living room with a grey sofa",
        "children playing in the park",
        "old stone bridge over a river",
        "cup of coffee and a book",
    ],
    "de": [
        "ein rotes Auto auf der Straße",
        "Porträt einer lächelnden Frau",
        "Sonnenuntergang über den Bergen",
        "schwarzer Hund läuft am Strand",
        "alter Holzstuhl",
        "frisches Gemüse auf dem Markt",
        "Mann fährt Fahrrad in der Stadt",
        "Nahaufnahme einer gelben Blume",
        "Wohnzimmer mit grauem Sofa",
        "Kinder spielen im Park",
        "alte Steinbrücke über einen Fluss",
        "Tasse Kaffee und ein Buch",
    ],
    "fr": [
        "une voiture rouge garée dans la rue",
        "portrait d'une femme souriante",
        "coucher de soleil sur les montagnes",
        "chien noir qui court sur la plage",
        "vieille chaise en bois",
        "légumes frais au marché",
        "homme à vélo en ville",
        "gros plan d'une fleur jaune",
        "salon avec un canapé gris",
        "enfants qui jouent dans le parc",
        "vieux pont de pierre sur une rivière",
        "tasse de café et un livre",
    ],
    "es": [
        "un coche rojo aparcado en la calle",
        "retrato de una mujer sonriente",
        "atardecer sobre las montañas",
        "perro negro corriendo en la playa",
        "silla de madera antigua",
        "verduras frescas en el mercado",
        "hombre en bicicleta por la ciudad",
        "primer plano de una flor amarilla",
        "sala de estar con sofá gris",
        "niños jugando en el parque",
        "viejo puente de piedra sobre un río",
        "taza de café y un libro",
    ],
    "it": [
        "una macchina rossa parcheggiata in strada",
        "ritratto di una donna sorridente",
        "tramonto sulle montagne",
        "cane nero che corre sulla spiaggia",
        "vecchia sedia di legno",
        "verdure fresche al mercato",
        "uomo in bicicletta in città",
        "primo piano di un fiore giallo",
        "soggiorno con divano grigio",
        "bambini che giocano nel parco",
        "vecchio ponte di pietra sul fiume",
        "tazza di caffè e un libro",
    ],
    "pt": [
        "um carro vermelho estacionado na rua",
        "retrato de uma mulher sorrindo",
        "pôr do sol sobre as montanhas",
        "cachorro preto correndo na praia",
        "cadeira de madeira antiga",
        "legumes frescos na feira",
        "homem andando de bicicleta na cidade",
        "close de uma flor amarela",
        "sala de estar com sofá cinza",
        "crianças brincando no parque",
        "velha ponte de pedra sobre o rio",
        "xícara de café e um livro",
    ],
    "nl": [
        "een rode auto geparkeerd op straat",
        "portret van een lachende vrouw",
        "zonsondergang boven de bergen",
        "zwarte hond rent op het strand",
        "oude houten stoel",
        "verse groenten op de markt",
        "man fietst door de stad",
        "close-up van een gele bloem",
        "woonkamer met een grijze bank",
        "kinderen spelen in het park",
        "oude stenen brug over een rivier",
        "kopje koffie en een boek",
    ],
    "ru": [
        "красная машина на улице",
        "портрет улыбающейся женщины",
        "закат над горами",
        "черная собака бежит по пляжу",
        "старый деревянный стул",
        "свежие овощи на рынке",
        "мужчина едет на велосипеде по городу",
        "желтый цветок крупным планом",
        "гостиная с серым диваном",
        "дети играют в парке",
        "старый каменный мост через реку",
        "чашка кофе и книга",
    ],
}


def py3langid():
    from py3langid import langid

    identifier = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    return lambda text: identifier.classify(text)[0]


def langid_():
    from langid.langid import LanguageIdentifier, model

    identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return lambda text: identifier.classify(text)[0]


def lingua():
    from lingua import LanguageDetectorBuilder

    detector = LanguageDetectorBuilder.from_all_languages().build()

    def detect(text):
        language = detector.detect_language_of(text)
        return language.iso_code_639_1.name.lower() if language else None

    return detect


CANDIDATES = {"py3langid": py3langid, "langid": langid_, "lingua": lingua}


def main(names):
    rows = [(lang, text) for lang, texts in CAPTIONS.items() for text in texts]
    for name in names:
        start = time.perf_counter()
        detect = CANDIDATES[name]()
        load = time.perf_counter() - start
        detect(rows[0][1])
        start, reps = time.perf_counter(), 5
        for _ in range(reps):
            got = [detect(text) for _, text in rows]
        per = (time.perf_counter() - start) / (reps * len(rows))
        correct = sum(g == lang for g, (lang, _) in zip(got, rows, strict=True))
        english = [g == "en" for g, (lang, _) in zip(got, rows, strict=True) if lang == "en"]
        print(
            f"{name:<10} accuracy {correct}/{len(rows)} = {correct / len(rows):.1%}  english recall "
            f"{sum(english)}/{len(english)}  {per * 1e6:,.0f} us/caption  load {load:.2f} s"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or list(CANDIDATES))
