"""The closed word list of :class:`~rmt_fast.experiments.tasks.WordTokenizer` besides the tasks' own words.

``NOISE_WORDS``: the 1,000 most frequent words (lower-cased, letters only) of the default noise, the prose of
Python's help texts (``PydocNoise``) as shipped with CPython 3.11: they cover ~93% of its words; the others
become ``[UNK]``. The list is frozen here so that the tokenizer's vocabulary does not depend on the Python
version (the help texts themselves differ a little between versions).
"""

NOISE_WORDS: tuple[str, ...] = tuple("""
    the a is of in to and for if be are an that class or as object it by not with this value function method can
    when s exception name statement x string return instance used type from module attribute on will sequence which
    all list objects defined called new only code one should may same arguments argument dictionary at expression
    python its see values types also any must set built clause version key methods no using block have other except
    but names they pattern true namespace first number y default such executed there raised then has following
    special context definition e given i tuple classes these result assignment dict section operations case
    characters implementation none syntax attributes items keyword global hash more call changed each does suite
    support than current false keys note character execution functions otherwise empty mapping base created
    expressions variable variables implement length comparison target use local was within c format getitem example
    instances raises operation returns standard their bound line order so item point returned either found import
    numeric positional strings like reference always descriptor evaluated raise sequences slots where before left
    two you define g mutable operator single some contains frame try after integer interpreter iterable non numbers
    right bytes end parameter passed present subject finally form scope assigned do most occurs statements those
    both command containing instead match str defines through without access literals self collections index next
    range t behavior cannot corresponding f future iterator level slice specified being body multiple possible
    typeerror up zero been data decimal different exceptions explicitly n program references while continue del
    equal get traceback uses way yield cpython formatting including into normal sys user annotations binding create
    else len p pep time unless elements foo implemented last literal means metaclass operators over part container
    error immutable loop matches negative parameters abc below considered described optional start breakpoint
    details digits information integers itself rather stack step subclass unicode yields attributeerror available
    builtins debugger directly equivalent evaluation however invoked k rules allows async b commands exit getattr
    handler identifier init lists mappings matching once patterns provide whose arbitrary between break copy handled
    original pdb precision were additional because represent runtime added another contain descriptors evaluate
    field group how imported nested print slicing would add assignments boolean calls clauses common compare complex
    converted custom d detail documentation even file floating manager refer required treated valid co during
    examples execute int j search sets specification stored three via about eq identifiers iteration least override
    similar until width allowed bit calling coroutine count determined done formal formatted generator hashable
    keywords less metaclasses modules operand option out owner separator u allow appropriate augmented certain
    constructor defining definitions dictionaries free globals interpreted language m made now obj omitted own pairs
    provided read removed representation resulting simple since them tuples whether z actually around asynchronous
    cases change comma control defaults evaluates fails float identity meaning normally property side still test
    trace accessed cls contained customize def delete division enter getattribute help leading listed lookup missing
    never pair parentheses place previously r re semantics setting source space subscription typically addition
    already binary changes display enclosing equality exactly exec follows lines notation notimplemented
    presentation repr reversed separated static stop supported table top trailing usually abstract callable cause
    deletion description executes exist guard library occur primary resolution results saved sign slot subclasses
    targets truth view arithmetic ascii back bool computed conversion creation debugging effect entire executable
    follow garbage hand important inside intended latter needs old particular position prefix remaining represented
    subpatterns supplied supports syntaxerror terminates total under underscore versions arg args automatically bar
    builds compile compiled condition continues creating derived encoding event feature followed handling include
    iterate lambda managers membership nearest need nonlocal package pass priority run second setattr specific
    specify star succeed succeeds terms text unlike useful weakref accept although auditing becomes blocks bytearray
    chars clear collection concatenation containers customized debug declaration decorators depending dir don due
    efficient eval explicit full func generally guaranteed hierarchy implementations interpretation iter just letter
    named needed often overridden parent proper protocol refers replacement selects subpattern substring transformed
    underlying well what whitespace words written above against aliases assign await backslash bases binds brackets
    column correctly currently declared deleted difference digit doesn double entries environment errors existing
    exited general generic handlers hint identified implementing includes indices inheritance insertion invocation
    later loaded matched ordering pow precedence reached recommended regular resolved reverse spec specifies
    specifying square sub tests unary users valueerror various virtual actual affect applied apply avoid based baz
    bindings bitwise breakpoints cased check compared comparisons constructed copied depends element enabled
    enclosed escape floor flow further greater happens implicit included interactive kind lower main makes modified
    operands options ordered outside points previous produce proposal provides raw related remove replaced
    represents retrieved rich script searched sep sorted style testing undefined unpacking works wrapped writable
    accessing applies automatic bits builtin byte caller caught causes convenient cycle desired emulate entry excess
    executing fixed frozenset grammar header implements indexed indexerror indicates individual inserted isinstance
    keyerror locale lowercase make many myclass occurred op possibly power prevent printed quotes repetition rest
    significant starred suffix system tab tb therefore third thus transformation underscores update uppercase
    accessible alias appear appears attempt attr bytecode category caused cleanup compound compute contents could
    decorated decorator direct doc evaluating every extension fail features fields files find formed gives grouping
    guarantees handle hence here illegal imaginary implicitly inserting introduced invoke irrefutable known large
    larger lineno locals longer looked mechanism memory mod modifies modifying modulo occurrence outer output
    preceding prepare processed ranges referenced reflected repeated restriction restrictions selected size soft
    split starting super take takes themselves though times together unchanged views able absolute adding alignment
    assigns associated attached become begins behaviour bind coefficient collected colon commonly comprehension
    convert coroutines declarations destroyed detected differ divmod duplicate dynamic ellipsis escapes etc
    exceptiongroup failed filled flags iadd ignore ignored indexes indicate inherit initialized inspect interface
    invoking iterating lc looking maxsplit model mro nameerror naming nor o occurring overrides overriding padding
    passes pdbrc private process produced properties public py raising real
""".split())
